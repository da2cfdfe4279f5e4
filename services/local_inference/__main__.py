"""``python -m services.local_inference``"""

from services.local_inference.app import SERVICE, main
from services.local_inference.settings import InferenceSettings
from shared.service import run

if __name__ == "__main__":
    run(SERVICE, InferenceSettings, main)
