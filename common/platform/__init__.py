"""The local platform: supervisor, embedded Redis, the demo."""
