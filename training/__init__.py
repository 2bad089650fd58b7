"""Training for seedstory's three stages, on accelerate, with the library's own model classes and its
one prompt serializer:

- ``training.stage1_detokenizer``: de-tokenizer pre-training (reconstruct images from visual-tokenizer
  features; optionally training a small visual tokenizer jointly, for models trained from scratch);
- ``training.stage2_agent``: instruction tuning of the agent on stories (LM loss + cosine regression);
- ``training.stage3_adapt``: de-tokenizer adaptation on the agent's regressed features;
- ``training.text_tokenizer``: a BPE text tokenizer with the image tokens, for small models.

Run each as ``accelerate launch -m training.<stage> --config configs/train/<...>.yaml`` (or plain
``python -m training.<stage> ...`` on one device).
"""
from seedstory.quiet import quiet_libraries

quiet_libraries()  # before any stage imports transformers or diffusers: their developer notices are not the user's
