"""Adapters that let engines call dspark's ops through the interfaces they already use.

* ``dspark_ext.integrations.flashinfer``: ``chain_speculative_sampling`` with FlashInfer's
  signature, shapes and return convention.
* ``dspark_ext.integrations.transformers``: a drop-in for transformers' assisted-generation
  ``_speculative_sampling`` and a context manager that installs it.
* ``dspark_ext.integrations.vllm``: a rejection sampler for vLLM's V1 model runner, loaded
  through the ``vllm.general_plugins`` entry point when ``DSPARK_VLLM_VERIFY=1``.

Each module imports its engine lazily, so importing this package needs none of them.
"""
