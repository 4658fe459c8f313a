"""Files the stages and processes share: append-only JSONL with resume by row id (``jsonl``) and the failure
handshake between the processes of one launch (``peers``)."""
