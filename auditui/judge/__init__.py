"""LLM-judge grading for auditui, independent of the engine: rubrics as data files (`rubrics`), the
answer parser (`parse`) and the OpenAI-compatible caller (`client`). The session-aware part (cache,
stored calls, sweeps) lives in `auditui.workflows.judge` and `auditui.workflows.sweep`."""
