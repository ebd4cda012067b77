"""The tutorial's API server, the reference that benchmarks/serve_load.py measures llmkit serve against.

Its design, kept as the tutorial wrote it: one global transformers `pipeline`, loaded at
startup; `/generate` validates the body, calls the pipeline for that one request and
returns JSON with `generated_text` (prompt included) and `inference_time_seconds`;
`/health` answers 503 until the model is loaded; Flask's development server with
threads (its default since Flask 1.0), so concurrent requests each call the shared
pipeline on their own thread, with no batching and no queue.

Two deliberate departures, both so the comparison is like for like:
- `max_length` is passed as `max_new_tokens` (the tutorial passed it as the pipeline's
  `max_length`, prompt included); llmkit reads it the same way.
- temperature 0 means greedy (`do_sample=False`), as in llmkit; otherwise it samples.

Usage: python benchmarks/flask_reference.py --model-folder FOLDER --port 5000
"""

from __future__ import annotations

import argparse
import logging
import time
from typing import Any

import torch
from flask import Flask, jsonify, request
from transformers import pipeline

DEFAULT_MAX_LENGTH = 64
MAX_LENGTH_LIMIT = 512
DEFAULT_TEMPERATURE = 0.7

app = Flask(__name__)
generator = None  # the tutorial's global pipeline, loaded once at startup
MODEL_NAME = ""
logger = logging.getLogger("flask_reference")


def initialize_model(model_folder: str) -> None:
    global generator, MODEL_NAME
    started = time.time()
    generator = pipeline("text-generation", model=model_folder, device=-1)
    MODEL_NAME = model_folder
    logger.info("model loaded in %.2f s", time.time() - started)


def validate_generation_request(data: dict[str, Any] | None) -> tuple[str | None, int | None]:
    if not data or "prompt" not in data:
        return "Missing required parameter: 'prompt'", 400
    max_length = data.get("max_length", DEFAULT_MAX_LENGTH)
    if not isinstance(max_length, int) or max_length < 1 or max_length > MAX_LENGTH_LIMIT:
        return f"max_length must be between 1 and {MAX_LENGTH_LIMIT}", 400
    temperature = data.get("temperature", DEFAULT_TEMPERATURE)
    if not isinstance(temperature, (int, float)) or temperature < 0.0 or temperature > 2.0:
        return "temperature must be between 0.0 and 2.0", 400
    return None, None


@app.route("/generate", methods=["POST"])
def generate():
    if generator is None:
        return jsonify({"error": "Model not loaded"}), 503
    try:
        data = request.get_json()
        error, status_code = validate_generation_request(data)
        if error:
            return jsonify({"error": error}), status_code
        prompt = data.get("prompt", "").strip()
        max_length = int(data.get("max_length", DEFAULT_MAX_LENGTH))
        temperature = float(data.get("temperature", DEFAULT_TEMPERATURE))
        sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
        start_time = time.time()
        result = generator(prompt, max_new_tokens=max_length, **sampling)
        inference_time = time.time() - start_time
        return jsonify(
            {
                "success": True,
                "prompt": prompt,
                "generated_text": result[0]["generated_text"],
                "inference_time_seconds": round(inference_time, 3),
                "parameters": {"max_length": max_length, "temperature": temperature},
            }
        ), 200
    except Exception as exc:  # the tutorial's catch-all
        logger.error("Error during generation: %s", exc, exc_info=True)
        return jsonify({"error": "Internal server error"}), 500


@app.route("/health", methods=["GET"])
def health():
    if generator is None:
        return jsonify({"status": "unhealthy", "error": "Model not loaded"}), 503
    return jsonify(
        {"status": "healthy", "model": MODEL_NAME, "device": "CPU", "cuda_available": torch.cuda.is_available()}
    ), 200


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-folder", required=True, help="a save_pretrained folder")
    parser.add_argument("--port", type=int, default=5000)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no access line per request on the benchmark's stderr
    initialize_model(args.model_folder)
    app.run(host="127.0.0.1", port=args.port, threaded=True)


if __name__ == "__main__":
    main()
