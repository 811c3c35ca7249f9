"""The OpenAI-compatible serving layer: the HTTP gateway (`gateway.py`), the engine behind it and `batch`
(`completions.py`), request and response models, decoding, sampling, scoring and chat templates."""
