# The model repository as an image, copied into each pod by the Deployment's init container:
#
#   docker build -f deploy/kubernetes/models.Dockerfile -t nextword-models:2026-11-25 .
#
# busybox supplies the `cp` the init container runs; the layer is just models/<name>/<version>/.
FROM busybox:1.36
COPY models/ /models/
