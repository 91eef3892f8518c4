# The repository's protos as a C++ library: every .proto under protos/, compiled with protoc and
# grpc_cpp_plugin into <build>/gen. Used by the native core (serving/core) and the bench tools
# (bench/native); needs PkgConfig::GRPCPP from the including project.
set(RNNSERVE_PROTO_ROOT ${CMAKE_CURRENT_LIST_DIR})

function(add_proto_library name)
  find_program(PROTOC protoc REQUIRED)
  find_program(GRPC_CPP_PLUGIN grpc_cpp_plugin REQUIRED)
  file(GLOB_RECURSE protos RELATIVE ${RNNSERVE_PROTO_ROOT} CONFIGURE_DEPENDS ${RNNSERVE_PROTO_ROOT}/*.proto)
  list(TRANSFORM protos PREPEND ${RNNSERVE_PROTO_ROOT}/ OUTPUT_VARIABLE every_proto)
  set(gen ${CMAKE_CURRENT_BINARY_DIR}/gen)
  file(MAKE_DIRECTORY ${gen})
  set(sources)
  foreach(proto ${protos})
    string(REGEX REPLACE "\\.proto$" "" stem ${proto})
    add_custom_command(
      OUTPUT ${gen}/${stem}.pb.cc ${gen}/${stem}.pb.h ${gen}/${stem}.grpc.pb.cc ${gen}/${stem}.grpc.pb.h
      COMMAND ${PROTOC} -I ${RNNSERVE_PROTO_ROOT} --cpp_out=${gen} --grpc_out=${gen}
              --plugin=protoc-gen-grpc=${GRPC_CPP_PLUGIN} ${RNNSERVE_PROTO_ROOT}/${proto}
      DEPENDS ${every_proto}  # a proto's imports change its generated code too
      COMMENT "protoc ${proto}")
    list(APPEND sources ${gen}/${stem}.pb.cc ${gen}/${stem}.grpc.pb.cc)
  endforeach()
  add_library(${name} STATIC ${sources})
  target_include_directories(${name} SYSTEM PUBLIC ${gen})  # generated code: not ours to warn about
  target_link_libraries(${name} PUBLIC PkgConfig::GRPCPP)
endfunction()
