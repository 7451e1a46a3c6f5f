// The Python module that loads fnevr's CUDA kernels (fnevr._C_cuda). Load fnevr._C first: it
// defines the schemas these kernels implement.
#include <Python.h>

// The GPU code it holds, e.g. "sm_80,sm_90,compute_90" (setup.py defines it from the build's arch
// list): fnevr/_extension.py tells from it whether these kernels can run on the GPU at hand.
#ifndef FNEVR_CUDA_ARCHS
#define FNEVR_CUDA_ARCHS
#endif
#define FNEVR_STRINGIFY(...) #__VA_ARGS__
#define FNEVR_STRING(...) FNEVR_STRINGIFY(__VA_ARGS__)

extern "C" PyObject* PyInit__C_cuda(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C_cuda", "fnevr's compiled CUDA kernels", -1, nullptr};
  PyObject* m = PyModule_Create(&module);
  if (m != nullptr && PyModule_AddStringConstant(m, "cuda_archs", FNEVR_STRING(FNEVR_CUDA_ARCHS)) != 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
