"""``python -m services.cloud_adapter``"""

from services.cloud_adapter.adapter import SERVICE
from services.cloud_adapter.app import main
from services.cloud_adapter.settings import CloudSettings
from shared.service import run

if __name__ == "__main__":
    run(SERVICE, CloudSettings, main)
