"""`data_prep.prep.session_conf`: the settings plm-prep builds its SparkSession with."""

from pathlib import Path

from data_prep.prep import DEFAULT_SPARK_CONF, LOCAL_LOG4J, REQUIRED_SPARK_CONF, is_local, session_conf
from plm.config import SparkConfig

JAVA = "spark.driver.extraJavaOptions"


def test_local_mode_gets_plm_logging_and_keeps_the_jit_flag():
    conf = session_conf(SparkConfig(master="local[2]"))
    assert "-XX:-DontCompileHugeMethods" in conf[JAVA]
    assert f"-Dlog4j2.configurationFile={LOCAL_LOG4J.as_uri()}" in conf[JAVA]
    assert LOCAL_LOG4J.is_file()  # shipped with the package (pyproject package-data)
    text = LOCAL_LOG4J.read_text()
    assert "rootLogger.level = warn" in text and "org.apache.hadoop.util.NativeCodeLoader" in text
    assert all(conf[k] == v for k, v in REQUIRED_SPARK_CONF.items())


def test_cluster_driver_keeps_the_clusters_logging():
    for master in ("yarn", "spark://host:7077", "k8s://https://api:6443", "local-cluster[2,1,1024]"):
        assert not is_local(master)
        conf = session_conf(SparkConfig(master=master))
        assert conf[JAVA] == DEFAULT_SPARK_CONF[JAVA], master


def test_user_settings_win_except_the_required_ones():
    user = {JAVA: "-Xss4m", "spark.driver.memory": "8g", "spark.sql.session.timeZone": "Europe/Paris"}
    conf = session_conf(SparkConfig(master="local[*]", conf=user))
    assert conf[JAVA] == "-Xss4m"  # replaced as a whole, as the README says
    assert conf["spark.driver.memory"] == "8g"
    assert conf["spark.sql.session.timeZone"] == "UTC"
    assert is_local("local") and is_local("local[*]") and not is_local("localhost")
    assert Path(LOCAL_LOG4J).parent.name == "data_prep"
