// Python entry point of fam_kernels._C.
//
// The kernels register themselves with the torch dispatcher (namespace `fam_C`,
// see TORCH_LIBRARY_FRAGMENT in csrc/cpu/*.cpp and TORCH_LIBRARY_IMPL in
// csrc/cuda/*.cpp); importing this module is what runs those registrations.
// The module itself exposes only build facts.
#include <Python.h>
#include <torch/library.h>

namespace {

PyObject* with_cuda(PyObject*, PyObject*) {
#ifdef FAM_WITH_CUDA
  Py_RETURN_TRUE;
#else
  Py_RETURN_FALSE;
#endif
}

PyObject* with_openmp(PyObject*, PyObject*) {
#ifdef _OPENMP
  Py_RETURN_TRUE;
#else
  Py_RETURN_FALSE;
#endif
}

PyMethodDef methods[] = {
    {"with_cuda", with_cuda, METH_NOARGS, "True when the CUDA kernels were compiled in."},
    {"with_openmp", with_openmp, METH_NOARGS, "True when the CPU kernels use OpenMP."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "FAM compiled kernels", -1, methods};

}  // namespace

// The schema namespace every kernel file adds its ops to.
TORCH_LIBRARY(fam_C, m) {}

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module_def); }
