import sys

from paged_backend.cli import main

sys.exit(main(["bench", *sys.argv[1:]]))
