"""Generation: sampling settings, logits -> token, the decoding loop, streamed text."""
