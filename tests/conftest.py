import os
import sys

sys.path.insert(0, os.path.dirname(__file__))  # tests/shardgen.py and friends
os.environ.setdefault("OMP_NUM_THREADS", "1")
