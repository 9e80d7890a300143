"""Model families behind one registry: encoder (Hugging Face), small (from scratch); llm later."""
