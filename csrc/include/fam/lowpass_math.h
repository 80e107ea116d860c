// Device-independent arithmetic of lowpass_blend, shared by the CPU (csrc/cpu) and
// CUDA (csrc/cuda) kernels: the folding of a line into the even/odd halves the band
// basis acts on, its adjoint (unfolding), and the blend. The band itself and its
// basis are defined once, in fam_kernels/_lowpass_basis.py.
//
// An n-line x is handled in mirror pairs (j, n - j), j = 0 .. n/2; the pair is a
// single index when j == 0 or 2j == n. Folding writes n values, even part first:
//   slot j                : e_j = x_j + x_{n-j}   (x_j for a single index)
//   slot n/2 + j (j >= 1) : o_j = x_j - x_{n-j}   (paired j only)
// and B^T x = [C^T e ; S^T o] for the cos rows C and sin rows S of the basis.
// Unfolding a folded f = [f_e ; f_o] gives y_j = f_e[j] + f_o[j], y_{n-j} = f_e[j] - f_o[j]
// (y_j = f_e[j] for a single index), so B [a ; b] = unfold([C a ; S b]).
// Callers iterate over pairs (for_each_pair on the CPU, one thread per pair on CUDA).
#pragma once

#include <stdint.h>

#include "fam/common.h"

namespace fam {
namespace lowpass {

// Element type of z / z_ref / out across the raw-pointer CUDA launchers.
enum class FloatKind : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Row r of the (B*C*H, W) view of a (B, C, H, W) tensor with arbitrary strides.
struct RowAddressing {
  int64_t channels, height, stride_b, stride_c, stride_h, stride_w;

  FAM_HD int64_t offset(int64_t row) const {
    const int64_t plane = row / height, h = row % height;
    return (plane / channels) * stride_b + (plane % channels) * stride_c + h * stride_h;
  }
};

FAM_HD int even_len(int n) { return n / 2 + 1; }
FAM_HD int odd_len(int n) { return (n - 1) / 2; }
FAM_HD int pair_count(int n) { return n / 2 + 1; }
FAM_HD bool is_single(int n, int j) { return j == 0 || 2 * j == n; }
FAM_HD int odd_slot(int n, int j) { return even_len(n) + j - 1; }

// Fold a mirrored pair (not is_single): reads the line through x(index), writes
// slots through put(slot, value). Branch-free, so CPU loops over j vectorise.
template <class Src, class Dst>
FAM_HD void fold_mirrored(int n, int j, const Src& x, const Dst& put) {
  const float a = x(j), b = x(n - j);
  put(j, a + b);
  put(odd_slot(n, j), a - b);
}

template <class Src, class Dst>
FAM_HD void fold_pair(int n, int j, const Src& x, const Dst& put) {
  if (is_single(n, j)) {
    put(j, x(j));
  } else {
    fold_mirrored(n, j, x, put);
  }
}

// Unfold a mirrored pair: reads slots through f(slot), writes the line through put(index, value).
template <class Src, class Dst>
FAM_HD void unfold_mirrored(int n, int j, const Src& f, const Dst& put) {
  const float even = f(j), odd = f(odd_slot(n, j));
  put(j, even + odd);
  put(n - j, even - odd);
}

template <class Src, class Dst>
FAM_HD void unfold_pair(int n, int j, const Src& f, const Dst& put) {
  if (is_single(n, j)) {
    put(j, f(j));
  } else {
    unfold_mirrored(n, j, f, put);
  }
}

// Every pair of an n-line: the single indices, then the mirrored pairs 1 .. (n-1)/2
// in a loop free of branches.
template <class Single, class Mirrored>
FAM_HD void for_each_pair(int n, const Single& single, const Mirrored& mirrored) {
  single(0);
  if (n % 2 == 0 && n >= 2) single(n / 2);
  for (int j = 1; j <= odd_len(n); ++j) mirrored(j);
}

// out = z + gain * LP(z_ref - z), elementwise once LP is known.
FAM_HD float blend(float z, float lowpassed, float gain) { return z + gain * lowpassed; }

}  // namespace lowpass
}  // namespace fam
