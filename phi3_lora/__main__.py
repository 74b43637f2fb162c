import sys

from phi3_lora.cli import main

sys.exit(main())
