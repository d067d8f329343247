"""The CPU demo's recipe (demo.py): sentences, eSpeak NG speech, the real-speech test set, the
small encoders and the Whisper and Qwen conversions. Each file runs as `python -m recipe.NAME`."""
