"""fastnest inside other LMM codebases, built on its Hugging Face-free core only (never ``fastnest.hf``).

- ``llava_original``: the original LLaVA code (haotian-liu/LLaVA, PyPI ``llava-torch``), whose
  ``LlavaLlamaForCausalLM`` the released M3 training code forks.

Each module is imported on its own (``import fastnest.integrations.llava_original``): nothing here is imported
by ``import fastnest``.
"""
