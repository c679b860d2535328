// Every dspark schema, declared once. Implementations register per backend in
// csrc/cpu/*.cpp (CPU) and csrc/cuda/*.cu (CUDA); fake (meta) kernels live in
// dspark_ext/ops.py.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing dspark_ext._C loads this library, which runs the registrations below.
// No Python functions are exported: the ops are reached through torch.ops.dspark.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(dspark, m) {
  m.def(
      "verify(Tensor target_logits, Tensor target_offset, Tensor draft_tokens, "
      "Tensor? draft_logits, Tensor num_draft, Tensor temperature, Tensor seed, "
      "Tensor offset, Tensor? top_k, Tensor? top_p) -> (Tensor out_tokens, Tensor num_accepted)");
  m.def(
      "markov_draft(Tensor backbone_logits, Tensor anchor, Tensor w1, Tensor w2, "
      "Tensor temperature, Tensor seed, Tensor offset, Tensor? d2t, int? num_candidates=None) "
      "-> (Tensor draft_tokens, Tensor draft_logits)");
  m.def(
      "markov_draft_(Tensor(a!) backbone_logits, Tensor anchor, Tensor w1, Tensor w2, "
      "Tensor temperature, Tensor seed, Tensor offset, Tensor? d2t, int? num_candidates=None) "
      "-> Tensor draft_tokens");
  m.def(
      "confidence(Tensor hidden, Tensor prev_tokens, Tensor? w1, Tensor weight, Tensor bias, "
      "Tensor? sts_temperature) -> (Tensor conf, Tensor survival)");
}
