"""Teacher sources (target layout: see the architecture in DESIGN.md). `api`: black-box teachers behind
OpenAI-compatible endpoints (`hf_distill.teachers.api.APITeacher`)."""
