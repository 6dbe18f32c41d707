"""``python -m data_plane.trainer``: run one trainer process (config from ``OPENLOOPS_WORKER_CONFIG``)."""

import sys

from data_plane.trainer.process import main

sys.exit(main())
