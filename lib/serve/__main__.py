"""`python -m lib.serve`: the server, or its feedback export (see lib/serve/__init__.py)."""
from lib.serve import main

main()
