import sys

from localkafka.launcher import main

sys.exit(main())
