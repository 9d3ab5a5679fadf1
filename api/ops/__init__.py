"""Operations: server runners (uvicorn, Gunicorn workers), the deployment preflight, the demo writer."""
