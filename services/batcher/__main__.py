"""``python -m services.batcher``"""

from services.batcher.app import main
from services.batcher.scheduler import SERVICE
from services.batcher.settings import BatcherSettings
from shared.service import run

if __name__ == "__main__":
    run(SERVICE, BatcherSettings, main)
