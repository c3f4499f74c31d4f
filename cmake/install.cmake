# Installs headers, both libraries and a package config, so that another project can write
#   find_package(lminf REQUIRED)
#   target_link_libraries(app PRIVATE lminf::lminf)   # or lminf::lminf_static
include(CMakePackageConfigHelpers)

set(lminf_config_dir ${CMAKE_INSTALL_LIBDIR}/cmake/lminf)

install(TARGETS lminf lminf_static EXPORT lminfTargets
  LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR}
  ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR}
  RUNTIME DESTINATION ${CMAKE_INSTALL_BINDIR})
install(DIRECTORY csrc/include/lminf DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})
install(EXPORT lminfTargets NAMESPACE lminf:: DESTINATION ${lminf_config_dir})

configure_package_config_file(cmake/lminfConfig.cmake.in
  ${PROJECT_BINARY_DIR}/lminfConfig.cmake INSTALL_DESTINATION ${lminf_config_dir})
# 0.x: a minor version may change the API, so only the same major.minor satisfies a request.
write_basic_package_version_file(${PROJECT_BINARY_DIR}/lminfConfigVersion.cmake
  COMPATIBILITY SameMinorVersion)
install(FILES ${PROJECT_BINARY_DIR}/lminfConfig.cmake ${PROJECT_BINARY_DIR}/lminfConfigVersion.cmake
  DESTINATION ${lminf_config_dir})

# The build tree is a package too: -Dlminf_DIR=<build dir> finds it without an install.
export(EXPORT lminfTargets NAMESPACE lminf:: FILE ${PROJECT_BINARY_DIR}/lminfTargets.cmake)
