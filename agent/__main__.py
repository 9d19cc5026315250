"""``python -m agent run ...``: the agent daemon alone (see :mod:`agent.service`)."""

from agent.service import main

main()
