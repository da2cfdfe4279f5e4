"""local-inference: runs local models with onnxruntime-genai and streams tokens to the caller.

The NATS side (``app.py``) admits work and publishes tokens; decoding runs in a separate process
(``decoder.py``) because onnxruntime-genai holds the GIL while it computes.
"""
