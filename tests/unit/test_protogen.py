"""The committed generated code matches the protos (regenerated into a temp dir and compared)."""

from serving import protogen


def test_every_proto_is_compiled_and_committed_code_has_no_drift():
    assert protogen.proto_files(), "no protos found"
    assert protogen.drift() == [], "run `make protos` (python -m serving.protogen) and commit"


def test_generated_code_imports_package_qualified():
    from serving._proto.rnnserve.v1 import rnnserve_pb2, rnnserve_pb2_grpc

    assert rnnserve_pb2.DESCRIPTOR.package == "rnnserve.v1"
    assert hasattr(rnnserve_pb2_grpc, "RnnServeServicer")
