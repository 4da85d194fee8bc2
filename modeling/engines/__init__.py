"""What runs a model on text: almak's generation loop, transformers' generate and vLLM, behind one interface."""
