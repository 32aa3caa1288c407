"""``python -m simfluence`` runs the command line."""
import sys

from simfluence.cli import main

sys.exit(main())
