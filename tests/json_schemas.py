"""The JSON shape of each ccr command (README.md, "JSON output"), as small JSON Schemas."""

from __future__ import annotations

from typing import Any

TIME = {
    "type": ["string", "null"],
    "pattern": r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00$",
}
EPOCH = {"type": ["number", "null"]}
JOB_ID = {"type": "integer", "minimum": 0}
STEP_ID = {"type": ["integer", "null"], "minimum": 0}
STEP = {"type": "string", "pattern": r"^\d+\.\d+$"}
GENERATION = {"type": ["integer", "null"], "minimum": 1}
PATH = {"type": "string", "minLength": 1}
COUNT = {"type": "integer", "minimum": 0}
SECONDS = {"type": "number", "minimum": 0}


def obj(required: dict[str, Any], optional: dict[str, Any] | None = None) -> dict[str, Any]:
    """An object with exactly these keys: every required one, maybe the optional ones."""
    return {
        "type": "object",
        "required": list(required),
        "properties": {**required, **(optional or {})},
        "additionalProperties": False,
    }


def stamped(name: str) -> dict[str, Any]:
    return {name: TIME, f"{name}_epoch": EPOCH}


STEP_REF = obj({"step": STEP, "job_id": JOB_ID, "step_id": COUNT})
GENERATION_ENTRY = obj(
    {"path": PATH, "generation": GENERATION, **stamped("created"), "bytes": COUNT}
)
CHECK = obj(
    {"check": {"type": "string"}, "ok": {"type": "boolean"}, "detail": {"type": "string"}},
    {  # a file the job writes (restart --check): what restart does to it
        "path": PATH,
        "action": {"enum": ["restore", "unchanged", "truncate", "refuse", "append"]},
        "size": COUNT,
        "current_size": {"type": ["integer", "null"], "minimum": 0},
    },
)

RUN = obj(
    {
        "step": STEP,
        "job_id": JOB_ID,
        "step_id": COUNT,
        "pid": {"type": "integer", "minimum": 1},
        "supervisor_pid": {"type": "integer", "minimum": 1},
        "output": {"type": ["string", "null"]},
        "resumed": {"type": ["string", "null"]},
        "detached": {"type": "boolean"},
        "exit_code": {"type": ["integer", "null"]},
    }
)
CREATE = obj(
    {
        "job_id": JOB_ID,
        "step_id": STEP_ID,
        "generation": GENERATION,
        **stamped("created"),
        "path": PATH,
        "link": PATH,
        "steps": {"type": "array", "items": COUNT},
        "frozen_time": SECONDS,
        "total_time": SECONDS,
        "image_bytes": COUNT,
        "stored_bytes": COUNT,
        "ratio": {"type": ["number", "null"]},
        "stats": {"type": "object"},
    }
)
RESTARTED = obj(
    {
        "step": STEP,
        "job_id": JOB_ID,
        "step_id": COUNT,
        "generation": GENERATION,
        "pid": {"type": "integer", "minimum": 1},
        "supervisor_pid": {"type": "integer", "minimum": 1},
        "checkpoint": PATH,
        "restore_time": SECONDS,
        "unpack_time": SECONDS,
        "verify_time": SECONDS,
        "criu_time": SECONDS,
        "resume_time": SECONDS,
        "fill_time": {"type": ["number", "null"], "minimum": 0},
        "peak_extra_bytes": COUNT,
        "streamed": {"type": "boolean"},
        "lazy": {"type": "boolean"},
    }
)
RESTART = obj(
    {
        "job_id": JOB_ID,
        "step_id": STEP_ID,
        "mode": {"enum": ["local", "check", "requeued", "submitted"]},
        "steps": {"type": "array", "items": RESTARTED},
    },
    {
        "ok": {"type": "boolean"},  # mode check
        "checks": {"type": "array", "items": CHECK},
        "slurm_job": JOB_ID,  # modes requeued, submitted (a multi-node checkpoint)
        "checkpoints": {"type": "array", "items": PATH},
        "nodes": {"type": "array", "items": {"type": "string"}},
    },
)
SHOWN = obj(
    {
        "checkpoint": PATH,
        "step": STEP,
        "job_id": JOB_ID,
        "step_id": COUNT,
        "generation": GENERATION,
        "authenticated": {"type": "boolean"},
        "command": {"type": "array", "items": {"type": "string"}},
        "cwd": PATH,
        "output": {"type": ["string", "null"]},
        "node": {"type": "string"},
        "uid": COUNT,
        **stamped("created"),
        "criu_version": {"type": "string"},
        "compression": {"type": "string"},
        "image_bytes": COUNT,
        "stored_bytes": COUNT,
        "ratio": {"type": ["number", "null"]},
        "frozen_time": SECONDS,
        "total_time": SECONDS,
        "stats": {"type": "object"},
        "restart_count": COUNT,
        "gpu": {"type": ["object", "null"]},
        "processes": {"type": "array", "items": {"type": "object"}},
    },
    {"rank": COUNT},  # a rank of a multi-node step
)
SHOW = obj({"checkpoints": {"type": "array", "items": SHOWN, "minItems": 1}})
LIST = obj(
    {
        "jobs": {
            "type": "array",
            "items": obj(
                {
                    "job_id": JOB_ID,
                    "checkpoint_dir": PATH,
                    "steps": {
                        "type": "array",
                        "items": obj(
                            {
                                "step": STEP,
                                "job_id": JOB_ID,
                                "step_id": COUNT,
                                "state": {"type": "string"},
                                "command": {"type": "array", "items": {"type": "string"}},
                            }
                        ),
                    },
                }
            ),
        }
    }
)
STATUS_STEP = obj(
    {
        "step": STEP,
        "job_id": JOB_ID,
        "step_id": COUNT,
        "state": {"type": "string"},
        "pids": {"type": "array", "items": {"type": "integer"}},
        "init_pid": {"type": ["integer", "null"]},
        "supervisor_pid": {"type": ["integer", "null"]},
        "command": {"type": "array", "items": {"type": "string"}},
        "cwd": PATH,
        "output": {"type": ["string", "null"]},
        **stamped("started"),
        **stamped("ended"),
        "exit_code": {"type": ["integer", "null"]},
        **stamped("next_checkpoint"),
        "generations": {"type": "array", "items": GENERATION_ENTRY},
    }
)
STATUS = obj(
    {
        "job_id": JOB_ID,
        "checkpoint_dir": PATH,
        "interval_s": COUNT,
        "keep": COUNT,
        "disabled": COUNT,
        "restart_count": COUNT,
        "last_error": {"type": ["string", "null"]},
        "steps": {"type": "array", "items": STATUS_STEP},
        "job_generations": {"type": "array", "items": GENERATION_ENTRY},
        "last_checkpoint": {
            "oneOf": [
                {"type": "null"},
                obj(
                    {
                        "path": PATH,
                        **stamped("time"),
                        "step_id": STEP_ID,
                        "frozen_time": SECONDS,
                        "total_time": SECONDS,
                        "image_bytes": COUNT,
                        "stored_bytes": COUNT,
                    }
                ),
            ]
        },
    }
)
CANCEL = obj({"job_id": JOB_ID, "cancelled": {"type": "array", "items": STEP_REF}})
CONVERT = obj({"checkpoint": PATH, "codec": {"type": "string"}})
VERIFY = obj({"checkpoint": PATH, "ok": {"const": True}, "steps": {"type": "array", "items": PATH}})
ABLE = obj({"job_id": JOB_ID, "able": {"type": "string"}, **stamped("began")})
ERROR = obj({"job_id": JOB_ID, "code": COUNT, "message": {"type": "string"}})
DISABLED = obj({"job_id": JOB_ID, "disabled": COUNT})
VERSION = obj(
    {
        "version": {"type": "string"},
        "python": {"type": "string"},
        "kernel": {"type": "string"},
        "pycriu": {"type": "boolean"},
        "criu": obj(
            {
                "binary": {"type": ["string", "null"]},
                "version": {"type": ["string", "null"]},
                "works": {"type": "boolean"},
                "features": {"type": "object", "additionalProperties": {"type": "boolean"}},
                "incremental_dumps": {"type": "boolean"},
                "lazy_pages": {"type": "boolean"},
            },
            {"error": {"type": "string"}},
        ),
    }
)
DOCTOR = obj(
    {
        "ok": {"type": "boolean"},
        "checks": {
            "type": "array",
            "items": obj(
                {
                    "check": {"type": "string"},
                    "ok": {"type": "boolean"},
                    "detail": {"type": "string"},
                    "fix": {"type": ["string", "null"]},
                }
            ),
        },
    }
)
FAILURE = obj({"error": {"type": "string", "minLength": 1}, "code": {"type": "integer"}})

# Each command (as README's "JSON output" table names it) and its schema.
SHAPES: dict[str, dict[str, Any]] = {
    "run": RUN,
    "create": CREATE,
    "checkpoint create|vacate|requeue": CREATE,
    "restart": RESTART,
    "checkpoint restart": RESTART,
    "show": SHOW,
    "list": LIST,
    "status": STATUS,
    "cancel": CANCEL,
    "compress|decompress": CONVERT,
    "verify": VERIFY,
    "checkpoint able": ABLE,
    "checkpoint error": ERROR,
    "checkpoint disable|enable": DISABLED,
    "version": VERSION,
    "doctor": DOCTOR,
    "any error (stderr)": FAILURE,
}
