# The model server, built from the package: docker build -t mnist-serve . && docker run -p 8000:8000 mnist-serve
# Serves MODEL (a registry URI needs MLFLOW_TRACKING_URI; a file or checkpoint can be mounted into /models).
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml constraints.txt README.md ./
COPY mnist_dlops ./mnist_dlops
# torch's CPU wheel: the default index would fetch the CUDA build (several GB).
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu torch==2.13.0 \
 && pip install --no-cache-dir -c constraints.txt ".[export]"
ENV MODEL=models:/mnist-digits@production
EXPOSE 8000
RUN useradd --create-home server
USER server
CMD ["sh", "-c", "exec mnist-dlops serve --model \"$MODEL\" --host 0.0.0.0 --port 8000"]
