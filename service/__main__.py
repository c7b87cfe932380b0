"""python -m service: serve MODELS_DIR on HOST:PORT with the limits from the settings."""

from service.config import get_settings
from service.server import serve

if __name__ == "__main__":
    serve(get_settings())
