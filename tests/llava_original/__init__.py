"""Cases run by tests/test_llava_original.py in a child pytest, in the original LLaVA code's own environment
(transformers 4.36.2, llava-torch; tools/llava_original_env.py). Their names are not ``test_*``: the project's
own run, in its own environment, does not collect them."""
