"""The API's job queue for in-process API tests: records the job ids it is given (or fails
like a broker that is down), so no Celery broker is needed."""


class RecordingQueue:
    def __init__(self, fail: bool = False):
        self.sent, self.fail = [], fail

    def enqueue(self, job_id):
        if self.fail:
            raise ConnectionError("broker down")
        self.sent.append(job_id)
