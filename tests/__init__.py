"""The test suite, one folder per package of the project (data, losses, models, utils, scripts) and
the entry scripts' tests at the top."""
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
