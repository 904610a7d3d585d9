"""The engine runtime a packaged tray app fetches on its first *Start earning*: torch, transformers,
peft, llama.cpp and the rest, the build that fits this machine's GPU, from the same locks as the
set-up (requirements/), every file checked against its sha256.

- `pins`: which files make a runtime (the locks, read for this machine) and which build fits it;
- where the files are and their resumable download: `engine.package_index` (the catalogue's too);
- `wheels`: a wheel unpacked into the runtime, and the check of what is installed against its hashes;
- `fetch`: the versioned runtime directory: fetch, resume, cancel, repair, switch when the lock changes.
"""
