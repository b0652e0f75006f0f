"""``make book-results``: ship the finished runs of the last build (the writer is ``hqdit_utils.runs.run_store``)."""
import sys

from hqdit_utils.runs.run_store import main

if __name__ == "__main__":
    sys.exit(main())
