"""``python -m data_plane.trainer``: run one trainer worker (config from ``OPENLOOPS_WORKER_CONFIG``)."""

import sys

from data_plane.trainer.worker import main

sys.exit(main())
