// Native methods take their messages as raw bytes and parse them here, so malformed bytes get
// INVALID_ARGUMENT from the one table (gRPC's own parse failure answers INTERNAL on unary calls
// and ends a stream as if the client had half-closed it).
#pragma once

#include <grpcpp/support/byte_buffer.h>
#include <grpcpp/support/proto_buffer_reader.h>
#include <grpcpp/support/proto_buffer_writer.h>

#include "errors.h"

namespace rnnserve {

template <class M>
bool parse(const grpc::ByteBuffer& bytes, M* out) {
  grpc::ByteBuffer copy(bytes);  // the reader consumes what it reads; slices are shared, not copied
  grpc::ProtoBufferReader reader(&copy);
  out->Clear();
  return out->ParseFromZeroCopyStream(&reader) && out->IsInitialized();
}

template <class M>
grpc::ByteBuffer serialize(const M& message) {
  grpc::ByteBuffer out;
  grpc::ProtoBufferWriter writer(&out, grpc::kProtoBufferWriterMaxBufferLength,
                                 static_cast<int>(message.ByteSizeLong()));
  message.SerializeToZeroCopyStream(&writer);
  return out;
}

template <class M>
Error malformed(const M& message) {
  return Error::invalid("malformed request: the bytes are not a valid " + message.GetDescriptor()->full_name() +
                            " message",
                        "request");
}

}  // namespace rnnserve
