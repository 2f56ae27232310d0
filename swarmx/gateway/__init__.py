"""The OpenAI-compatible gateway: an HTTP front door that turns client calls into scheduled ones."""
