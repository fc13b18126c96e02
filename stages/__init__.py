"""sftflow: raw chats -> prepared shards -> fine-tuned, merged, evaluated model, one DVC stage each."""

__version__ = "0.1.0"
