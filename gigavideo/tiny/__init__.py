"""Random-weight, CPU-sized models of the real classes, built from configs with no hub (tests, the tiny preset):
tokenizers.py (the tiny tokenizers and language-model sizes), judges.py (LLaVA-OneVision, Qwen2.5-VL, Qwen3-VL
judges saved with their real processor settings), chat.py (a chat model for stage 1). The tiny video pipelines
are each family's `build_tiny_pipeline` (gigavideo/models/families/), at the architecture that family defines."""
