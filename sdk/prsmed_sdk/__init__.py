"""Client for the PRS-Med service. Its pydantic models are the wire contract the service uses.

    from prsmed_sdk import Client
    client = Client("http://127.0.0.1:3000")
    answer = client.predict("scan.png", "Where is the lesion?")
    answer.answer, answer.zone, answer.mask           # the mask needs numpy: pip install 'prsmed-sdk[images]'
    job = client.finetune("my_dataset/", epochs=3)
    job.wait()
    client.predict("scan.png", "Where is the lesion?", adapter=job.adapter)
"""

from ._common import Retry
from .aclient import AsyncClient, AsyncJob
from .answer import Answer
from .client import Client, Job
from .errors import (Busy, Conflict, InvalidInput, JobFailed, NotFound, PrsMedError, ServerError, TooLarge,
                     Unauthorized)

__version__ = "0.1.0"
__all__ = ["Answer", "AsyncClient", "AsyncJob", "Busy", "Client", "Conflict", "InvalidInput", "Job", "JobFailed",
           "NotFound", "PrsMedError", "Retry", "ServerError", "TooLarge", "Unauthorized"]
