"""Text and tokens as the serving layer sees them: the token table a backend fills at load time
(tokens.py), and token bytes to text, character offsets and stop strings (decoding.py)."""
