"""Sirocco's HTTP edge: the OpenAI protocol, SSE, errors, metrics and settings; imports only `engine`'s public names."""
