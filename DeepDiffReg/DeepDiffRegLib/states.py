"""Processing states of the Register button / panel (MONAIAuto3DSeg-style state machine).

Idle -> Starting (checking options and dependencies, writing inputs) [-> Installing (child processes)] ->
Running (child process) -> Importing (results into the scene) -> Completed | Failed | Cancelled; CancelRequested
sits between Installing/Running and Cancelled. Every path ends in one of the three final states, whose message
stays on the panel (``controller.RunController``).
"""
from __future__ import annotations

import enum


class ProcessingState(enum.Enum):
    IDLE = "idle"
    STARTING = "starting"
    INSTALLING = "installing"
    RUNNING = "running"
    CANCEL_REQUESTED = "cancel_requested"
    IMPORTING = "importing"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def label(self) -> str:
        return STATE_LABELS[self]

    @property
    def busy(self) -> bool:
        """True while a run is under way (the Register button shows Cancel)."""
        return self in (ProcessingState.STARTING, ProcessingState.INSTALLING, ProcessingState.RUNNING,
                        ProcessingState.CANCEL_REQUESTED, ProcessingState.IMPORTING)

    @property
    def final(self) -> bool:
        return self in (ProcessingState.COMPLETED, ProcessingState.FAILED, ProcessingState.CANCELLED)

    @property
    def button_text(self) -> str:
        if self is ProcessingState.CANCEL_REQUESTED:
            return "Cancelling..."
        return "Cancel" if self.busy else "Register"


STATE_LABELS = {
    ProcessingState.IDLE: "Ready",
    ProcessingState.STARTING: "Starting (checking dependencies, writing inputs)...",
    ProcessingState.INSTALLING: "Installing Python packages...",
    ProcessingState.RUNNING: "Registering...",
    ProcessingState.CANCEL_REQUESTED: "Cancelling...",
    ProcessingState.IMPORTING: "Loading results into the scene...",
    ProcessingState.COMPLETED: "Done",
    ProcessingState.FAILED: "Failed",
    ProcessingState.CANCELLED: "Cancelled",
}

# Human-readable stage names for the progress bar (engine stage key -> label); see deepdiffreg.progress.STAGES.
STAGE_LABELS = {
    "load": "Loading images",
    "preprocess": "Preprocessing",
    "align": "Initial alignment",
    "register": "Registering",
    "refine": "Refining",
    "write": "Writing results",
    "done": "Done",
}


def stage_label(stage: str) -> str:
    return STAGE_LABELS.get(stage, stage.replace("_", " ").capitalize() if stage else "")
