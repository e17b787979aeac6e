from .watchdog import start_from_environment

start_from_environment()  # ends this process when the Slicer that started it is gone (DEEPDIFFREG_WATCH_PID)

from .cli import run  # noqa: E402

run()
