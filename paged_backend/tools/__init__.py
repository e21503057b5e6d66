"""Tool calling: OpenAI-shaped tool definitions, forced calls through structured outputs, and
parsers for the tool-call formats of the common chat templates."""
