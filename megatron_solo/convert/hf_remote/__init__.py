"""The HF ``trust_remote_code`` classes of SOLO. These files are COPIED into every exported HF directory, so each one
imports only transformers / torch / numpy / PIL / sentencepiece at module level (plus its siblings, relatively)."""
